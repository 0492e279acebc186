spring-hello = Spring is here, { $first_name }! Would you like a code for the spring collection?
spring-btn-yes = Yes, please
spring-btn-no = Not now
spring-code = Your code: SPRING15 (15% off until the end of May).
spring-bye = No problem. We will keep you posted.
